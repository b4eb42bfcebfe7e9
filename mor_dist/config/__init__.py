"""Config tree (schema), loading with overrides, and validation."""

from mor_dist.config.load import load_config, to_yaml
from mor_dist.config.schema import MoRConfig
from mor_dist.config.validate import RANGES, ConfigError, flag_type, validate

__all__ = ["RANGES", "ConfigError", "MoRConfig", "flag_type", "load_config", "to_yaml", "validate"]
