"""Data: packaged small data sets, official-format readers, HDF5 shards, the batch loader."""
from .datasets import TASKS, MissingDataError, Subset, TaskData, load_task
from .idx import DataFormatError
from .loader import ArraySet, BatchLoader
from .shards import ShardSet

__all__ = ["TASKS", "Subset", "TaskData", "load_task", "MissingDataError", "DataFormatError", "ArraySet",
           "BatchLoader", "ShardSet"]
