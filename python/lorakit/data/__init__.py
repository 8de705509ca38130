"""Training data: loading local files, formats and templates, loss masks, packing, dedup, mixing."""

from lorakit.data.config import DataConfig
from lorakit.data.encode import IGNORE, Example, encode
from lorakit.data.formats import RowError, to_segments
from lorakit.data.load import load_rows
from lorakit.data.packing import Row, collate, pack
from lorakit.data.pipeline import DataReport, PreparedData, prepare

__all__ = [
    "IGNORE",
    "DataConfig",
    "DataReport",
    "Example",
    "PreparedData",
    "Row",
    "RowError",
    "collate",
    "encode",
    "load_rows",
    "pack",
    "prepare",
    "to_segments",
]
