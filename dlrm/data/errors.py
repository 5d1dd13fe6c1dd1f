"""The one exception type for unusable Criteo input, locating the problem by file, line and field."""
from pathlib import Path


class CriteoDataError(ValueError):
    """Bad Criteo input. str() reads like `data/x.tsv:12: field C7: 'zz!' is not a hexadecimal id`.

    Attributes: `path` (the file), `line` (1-based, or None when the whole file is at fault),
    `field` (a column name such as "label", "I3", "C7", or None) and `reason` (the bare message).
    """

    def __init__(self, path: str | Path, reason: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        what = reason if field is None else f"field {field}: {reason}"
        super().__init__(f"{where}: {what}")
