"""Preference pairs about the tiny vocabulary of ``sft_helpers``."""

NUMBERS = "one two three four five six".split()


def pair_rows(n: int) -> list[dict[str, str]]:
    """``n`` pairs "question : what is one ?" -> chosen " two" (the next number), rejected two
    other numbers, cycling."""
    return [
        {
            "prompt": f"question : what is {NUMBERS[i % 6]} ?",
            "chosen": f" {NUMBERS[(i + 1) % 6]}",
            "rejected": f" {NUMBERS[(i + 3) % 6]} {NUMBERS[(i + 4) % 6]}",
        }
        for i in range(n)
    ]
