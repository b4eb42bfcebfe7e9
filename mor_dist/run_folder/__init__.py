"""The run folder (logging.run_dir), below training, launcher and inference: who may write in it
(lock.py), which config it belongs to (config_file.py), and how files meant for others are
written (files.py). Its checkpoints/ are mor_dist.checkpoint's.
"""

from mor_dist.run_folder.config_file import CONFIG_FILE, RunDirError, check_config, config_differences, write_config
from mor_dist.run_folder.lock import RunLock

__all__ = ["CONFIG_FILE", "RunDirError", "RunLock", "check_config", "config_differences", "write_config"]
