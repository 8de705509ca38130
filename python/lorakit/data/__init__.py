"""Training data: loading local files, formats and templates, loss masks, packing, dedup, mixing;
preference pairs for reward models and DPO."""

from lorakit.data.config import DataConfig
from lorakit.data.encode import IGNORE, Example, encode
from lorakit.data.formats import RowError, to_segments
from lorakit.data.load import load_rows
from lorakit.data.packing import Row, collate, pack
from lorakit.data.pair_pipeline import PreparedPairs, prepare_preferences
from lorakit.data.pairs import Pair, collate_pairs, encode_pair, truncate_pair
from lorakit.data.pipeline import DataReport, PreparedData, prepare
from lorakit.data.preference import PairSegments, pair_segments

__all__ = [
    "IGNORE",
    "DataConfig",
    "DataReport",
    "Example",
    "Pair",
    "PairSegments",
    "PreparedData",
    "PreparedPairs",
    "Row",
    "RowError",
    "collate",
    "collate_pairs",
    "encode",
    "encode_pair",
    "load_rows",
    "pack",
    "pair_segments",
    "prepare",
    "prepare_preferences",
    "to_segments",
    "truncate_pair",
]
