"""Device profiles (measured sub-model latency per device) and sizing sub-models to unequal devices."""

from .device import DeviceProfile, ProfileError, cost_features, load_profile, save_profile

__all__ = ["DeviceProfile", "ProfileError", "cost_features", "load_profile", "save_profile"]
