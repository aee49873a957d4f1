"""Hardware profiles: what this machine's CPU, RAM, disk and GPU can do, measured and saved as JSON."""

from .profile import default_profile_path, load_profile, measure_profile, save_profile, validate_profile

__all__ = ["default_profile_path", "load_profile", "measure_profile", "save_profile", "validate_profile"]
