"""Scenario configuration: the typed schema and the TOML loader."""

from vsim.config.load import ConfigError, dump_config, load_config
from vsim.config.schema import PAGE_LEVEL, ScenarioConfig

__all__ = ["PAGE_LEVEL", "ConfigError", "ScenarioConfig", "dump_config", "load_config"]
