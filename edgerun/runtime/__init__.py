"""Running a model: sampling and the generation loop."""
