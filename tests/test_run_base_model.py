"""`edgerun run --chat` on a model without a chat template (a base model): the prompt is continued as written, with
a one-line note; --system, which has no place in a plain prompt, is refused in one line."""

import json
import shutil

import pytest

import edgerun
from edgerun.cli import main
from edgerun.demo_model import demo_model_dir


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """The demo model without its chat template."""
    path = tmp_path_factory.mktemp("base") / "demo"
    shutil.copytree(demo_model_dir(), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_run_chat_continues_the_prompt_of_a_model_without_a_template(base_model, capsys):
    model = edgerun.load(base_model)
    assert not model.tokenizer.has_chat_template
    prompt = "ROMEO:\nGood morrow"
    want = model.generate(prompt, 12, temperature=0)
    assert main(["run", str(base_model), "--chat", "-p", prompt, "-n", "12", "--temp", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == want + "\n" and want.strip()
    notes = [line for line in err.splitlines() if "chat template" in line]
    assert len(notes) == 1 and "--chat is ignored" in notes[0] and "continued as written" in notes[0]
    assert "tok/s" in err.splitlines()[-1]
    # without --chat nothing is said, and the text is the same
    assert main(["run", str(base_model), "-p", prompt, "-n", "12", "--temp", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == want + "\n" and "chat template" not in err


def test_run_chat_with_a_system_prompt_is_refused_in_one_line(base_model, capsys):
    assert main(["run", str(base_model), "--chat", "--system", "Be brief.", "-p", "Hi", "-n", "4"]) == 2
    out, err = capsys.readouterr()
    err = err.strip()
    assert not out and "\n" not in err and "no chat template" in err and "--system" in err


def test_run_chat_keeps_the_template_of_a_model_that_has_one(capsys):
    model = edgerun.load(demo_model_dir())
    messages = [{"role": "user", "content": "Good morrow"}]
    want = model.chat(messages, 12, temperature=0)
    assert main(["run", str(demo_model_dir()), "--chat", "-p", "Good morrow", "-n", "12", "--temp", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == want + "\n" and "chat template" not in err
    assert want != model.generate("Good morrow", 12, temperature=0)  # the template made a difference
