"""What loading did to the data: records read, bad records, truncation, drops."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Bad records, damaged shards, identical and duplicate pairs each keep (and log) this many
# examples; the rest are counted.
MAX_EXAMPLES = 10


@dataclass
class DataStats:
    """Counts from one `load_preference_examples` call.

    Every process parses and validates all records (so the shares are cut from the same list of
    valid pairs) but tokenises only its share: records_read, bad_records, shards_cut_short,
    identical_pairs, duplicate_pairs and pairs_valid count the whole input; pairs_seen and the
    truncation counts this process's share.
    """

    records_read: int = 0  # non-blank lines, valid or not
    bad_records: int = 0  # skipped with on_bad_record="skip"
    bad_record_examples: list[str] = field(default_factory=list)  # "file:line: reason"
    shards_cut_short: int = 0  # damaged shards whose rest was skipped with on_bad_record="skip"
    shard_errors: list[str] = field(default_factory=list)  # "file[:line]: reason"
    identical_pairs: int = 0  # chosen == rejected (kept, warned about)
    duplicate_pairs: int = 0  # same prompt, chosen and rejected text as an earlier pair (kept)
    duplicate_pair_examples: list[str] = field(default_factory=list)  # "file:line (= file:line)"
    pairs_valid: int = 0  # records that became pairs
    pairs_seen: int = 0  # pairs this process tokenised
    pairs_truncated: int = 0  # pairs with any part cut short
    prompts_truncated: int = 0  # pairs whose prompt lost its start
    responses_truncated: int = 0  # completions (chosen and rejected counted apart) cut short
    pairs_dropped: int = 0  # truncated pairs removed by drop_truncated=True
    pairs_kept: int = 0  # pairs this process trains on

    @property
    def bad_record_lines(self) -> list[str]:
        """`file:line` of the first bad records."""
        return [message.split(": ", 1)[0] for message in self.bad_record_examples]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
