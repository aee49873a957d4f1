"""Hardware profile: schema round trip, validation errors, and the `edgerun profile` command (fast sizes)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from edgerun import cli
from edgerun.errors import EdgerunError
from edgerun.hw import profile as hw

_real_disk = hw.measure_disk


def _fake_bench(mp: pytest.MonkeyPatch) -> None:
    """Constant kernel and RAM figures: the kernels have tests of their own, and these take seconds."""
    mp.setattr(hw.bench, "gemv_throughput", lambda fmt, threads, **_: 10.0 * threads)
    mp.setattr(hw.bench, "gemm_throughput", lambda fmt, threads, **_: 50.0 * threads)
    mp.setattr(hw.bench, "ram_read_bandwidth", lambda threads, nbytes=0: 20.0)


def _small_disk(mp: pytest.MonkeyPatch) -> None:
    """A 64 MiB test file, 8 MiB read per measurement, whatever sizes the command asks for."""
    mp.setattr(hw, "measure_disk", lambda path, file_bytes, chunks, budget, log:
               _real_disk(path, 64 << 20, chunks, 8 << 20, log))


@pytest.fixture(autouse=True)
def fast(monkeypatch, tmp_path):
    _fake_bench(monkeypatch)
    monkeypatch.setenv("EDGERUN_CONFIG", str(tmp_path / "config"))


def _measure(tmp_path) -> dict:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    return hw.measure_profile(store, quick=True, disk_bytes=64 << 20, read_budget=8 << 20,
                              chunk_sizes=(1 << 20, 16 << 20), log=lambda _: None)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        _fake_bench(mp)
        return _measure(tmp_path_factory.mktemp("profile"))


def test_round_trip(measured, tmp_path):
    path = hw.save_profile(measured, tmp_path / "p.json")
    loaded = hw.load_profile(path)
    assert loaded == measured
    assert loaded["source"] == "measured with edgerun profile" and loaded["quick"] is True
    assert set(loaded["disk"]["random_read"]) == {str(1 << 20), str(16 << 20)}
    assert loaded["disk"]["seq_read_gbps"] > 0
    assert set(loaded["cpu"]["kernels"]) == {"q4", "q8"}
    assert "1" in loaded["ram"]["read_gbps"]


def test_gpu_section_is_null_without_cuda(measured):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert measured["gpu"] is None


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["disk"].pop("seq_read_gbps"), "missing key 'disk.seq_read_gbps'"),
    (lambda p: p.pop("cpu"), "missing key 'cpu'"),
    (lambda p: p["ram"].__setitem__("total_bytes", "lots"), "'ram.total_bytes' must be int"),
    (lambda p: p.__setitem__("quick", 1), "'quick' must be bool"),
    (lambda p: p["cpu"]["kernels"]["q4"].__setitem__("gemv_gbps", {"one": 1.0}), "'cpu.kernels.q4.gemv_gbps'"),
    (lambda p: p["disk"]["random_read"][str(1 << 20)].pop("qd1_gbps"), "qd1_gbps"),
    (lambda p: p.__setitem__("schema_version", 2), "schema_version 2"),
])
def test_validate_rejects(measured, edit, message):
    bad = copy.deepcopy(measured)
    edit(bad)
    with pytest.raises(EdgerunError, match=message.replace("(", r"\(")) as e:
        hw.validate_profile(bad)
    assert "\n" not in str(e.value)


def test_validate_accepts_a_gpu_section(measured):
    p = copy.deepcopy(measured)
    p["gpu"] = {"name": "X", "device": "cuda:0", "memory_bytes": 1 << 34, "h2d_gbps_pinned": 25.0,
                "h2d_gbps_pageable": 10.0, "kernels": {fmt: {"gemv_gbps": 100.0, "gemm_gflops": 5e4}
                                                        for fmt in ("q4", "q8")}}
    hw.validate_profile(p)
    del p["gpu"]["kernels"]["q8"]["gemm_gflops"]
    with pytest.raises(EdgerunError, match="gpu.kernels.q8.gemm_gflops"):
        hw.validate_profile(p)
    del p["gpu"]["name"]
    with pytest.raises(EdgerunError, match="gpu.name"):
        hw.validate_profile(p)


def test_the_gpu_section_is_measured_on_a_device():
    """The tier's figures on a torch device: the CPU stands in for a GPU here (no pinned memory, no streams)."""
    section = hw.measure_gpu("cpu", quick=True, log=lambda line: None)
    assert section["device"] == "cpu" and section["memory_bytes"] > 0
    assert section["h2d_gbps_pinned"] > 0 and section["h2d_gbps_pageable"] > 0
    assert all(section["kernels"][fmt][k] > 0 for fmt in ("q4", "q8") for k in ("gemv_gbps", "gemm_gflops"))
    profile = hw.load_profile(Path(__file__).parent.parent / "profiles" / "laptop-rtx4060-16gb.json")
    hw.validate_profile(profile | {"gpu": section})
    from edgerun.commands.profile import summary

    line = next(x for x in summary(profile | {"gpu": section}).splitlines() if x.startswith("gpu"))
    assert "CPU standing in for a GPU" in line and "GB/s pinned" in line and "q4" in line and "GFLOP/s" in line


def test_cli_writes_valid_profile_and_cleans_up(tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    store.mkdir()
    out = tmp_path / "p.json"
    _small_disk(monkeypatch)
    assert cli.main(["profile", "--quick", "--out", str(out), "--store-path", str(store)]) == 0
    profile = hw.load_profile(out)
    assert hw.load_profile(hw.default_profile_path()) == profile
    assert list(store.iterdir()) == []  # the temporary file is gone
    assert "disk" in capsys.readouterr().out


def test_cli_json(tmp_path, monkeypatch, capsys):
    _small_disk(monkeypatch)
    assert cli.main(["profile", "--quick", "--json", "--store-path", str(tmp_path)]) == 0
    hw.validate_profile(json.loads(capsys.readouterr().out))


def test_temp_file_removed_on_interrupt(tmp_path, monkeypatch):
    from edgerun.hw import disk

    def interrupted(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(disk, "_timed_reads", interrupted)
    with pytest.raises(KeyboardInterrupt):
        disk.measure_disk(tmp_path, 64 << 20, [1 << 20], 8 << 20)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["profile", "--quick", "--store-path", "/nonexistent/dir"], "--store-path /nonexistent/dir"),
    (["profile", "--quick", "--out", "/nonexistent/dir/p.json"], "--out /nonexistent/dir/p.json"),
])
def test_cli_bad_paths_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_every_reference_profile_validates_and_says_where_its_numbers_come_from():
    from pathlib import Path

    from edgerun.hw.profile import load_profile

    files = sorted((Path(__file__).parent.parent / "profiles").glob("*.json"))
    assert len(files) >= 4
    for path in files:
        profile = load_profile(path)
        assert profile["source"].startswith(("measured with edgerun profile", "reference:")), path
        if profile["source"].startswith("reference:"):
            assert profile.get("notes"), f"{path} gives no sources for its figures"


def test_read_ahead_follows_the_disk_and_kernels_of_the_profile():
    import copy
    import json
    from pathlib import Path

    from edgerun.runtime.placement import read_ahead

    base = json.loads((Path(__file__).parent.parent / "profiles" / "desktop-rtx4090-64gb.json").read_text())
    chunk = 16 << 20
    piece = str(4 << 20)  # the reader reads a chunk in 4 MiB calls: the 4 MiB figures apply
    base["disk"]["random_read"][piece].update(qd1_gbps=4.5, parallel_gbps=6.0, parallel_readers=4)
    # one reader: 4.5 GB/s qd1, 6.0 GB/s with 4 readers (less than 1.5x); two chunks per layer take
    # 2 * 16 MiB / 4.5 GB/s = 7.5 ms; a layer computes 2 * 16 MiB at 85% of 75 GB/s plus 10 MB of dense weights
    got = read_ahead(base, chunk_bytes=chunk, top_k=2, layer_dense_bytes=10_000_000, expert_format="q4")
    read = 2 * chunk / 4.5e9
    compute = 2 * chunk / (0.85 * 75.0e9) + 10_000_000 / (0.85 * 75.0e9)
    assert got == {"readers": 1, "prefetch_depth": min(4, -(-read // compute))}
    slow = copy.deepcopy(base)
    slow["disk"]["random_read"][piece].update(qd1_gbps=0.5, parallel_gbps=1.5)
    got = read_ahead(slow, chunk_bytes=chunk, top_k=2, layer_dense_bytes=10_000_000, expert_format="q4")
    assert got == {"readers": 4, "prefetch_depth": 4}  # parallel reads pay off; the disk is far behind
    slow["disk"]["random_read"][piece]["parallel_readers"] = 2
    assert read_ahead(slow, chunk_bytes=chunk, top_k=2, layer_dense_bytes=0, expert_format="q4")["readers"] == 2
    assert read_ahead(None, chunk_bytes=chunk, top_k=2, layer_dense_bytes=0, expert_format="q4") == {
        "readers": 1, "prefetch_depth": 1}


def test_threads_are_the_fewest_at_full_kernel_speed():
    from edgerun.hw.settings import best_threads

    profile = {"cpu": {"kernels": {"q4": {"gemv_gbps": {"1": 20.0, "4": 40.0, "8": 41.0, "16": 39.0},
                                          "gemm_gflops": {"1": 50.0, "4": 190.0, "8": 200.0, "16": 380.0}}}}}
    # GEMV: 4 threads give 40 of the best 41 (within 5%); GEMM needs 16; the engine takes the larger
    assert best_threads(profile, "q4") == 16
    profile["cpu"]["kernels"]["q4"]["gemm_gflops"]["16"] = 205.0  # 8 threads within 5% of 205
    assert best_threads(profile, "q4") == 8
    profile["cpu"]["kernels"]["q8"] = profile["cpu"]["kernels"].pop("q4")
    assert best_threads(profile, "q4") == 8  # a format the profile lacks falls back to q8's figures


def test_local_profile_is_measured_once_when_missing_in_a_child_process(tmp_path, monkeypatch):
    import edgerun.hw.profile as profile_module
    import edgerun.hw.settings as settings

    monkeypatch.setenv("EDGERUN_CONFIG", str(tmp_path / "config"))
    monkeypatch.setenv("EDGERUN_CACHE", str(tmp_path / "cache"))

    def in_this_process(*args, **kwargs):
        raise AssertionError("measured in the process that loads the model")

    monkeypatch.setattr(profile_module, "measure_profile", in_this_process)
    profile, source = settings.local_profile()
    assert source == str(tmp_path / "config" / "profiles" / f"{profile['hostname']}.json")
    assert profile["quick"] and profile["source"] == "measured with edgerun profile"
    assert profile["disk"]["path"] == str(tmp_path / "cache") and profile["cpu"]["kernels"]["q4"]["gemv_gbps"]
    mtime = Path(source).stat().st_mtime_ns
    assert settings.local_profile() == (profile, source) and Path(source).stat().st_mtime_ns == mtime  # saved once
    assert settings.local_profile(measure=False) == (profile, source)


def test_a_failed_measurement_is_one_line(tmp_path, monkeypatch):
    import edgerun.hw.settings as settings

    monkeypatch.setattr(settings, "_MEASURE", "raise SystemExit('no disk to measure')")
    with pytest.raises(EdgerunError, match=r"^measuring this machine failed: no disk to measure \(run"):
        settings.measure_apart(tmp_path / "profile.json")
    assert not (tmp_path / "profile.json").exists()
