"""Errors and warnings raised by the data package.

Every problem with user data is reported as a :class:`DataError` that names the file and, where there is
one, the image / annotation it concerns, so a bad record in a 100k-image dataset can be found at once.
Problems that are repaired on the fly (a box clipped to its image, a degenerate box dropped, a broken image
skipped) are reported as a :class:`DataWarning` and counted by the dataset instead.
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A data file or record that cannot be used.

    Attributes:
        path: the file concerned (image or annotation file), or ``None`` (e.g. an in-memory array).
        item: what inside the file is concerned, e.g. ``"annotation id 17"`` or ``"image id 3"``, or ``None``.
        reason: what is wrong, without the location.

    ``str(error)`` reads ``"<path>: <item>: <reason>"`` (leaving out whatever is ``None``).
    """

    def __init__(self, reason: str, path: str | Path | None = None, item: str | None = None) -> None:
        self.path = None if path is None else str(path)
        self.item = item
        self.reason = reason
        parts = [p for p in (self.path, item, reason) if p]
        super().__init__(": ".join(parts))

    def __reduce__(self):  # keep the fields when the error crosses a DataLoader worker boundary
        return (type(self), (self.reason, self.path, self.item))


class DataWarning(UserWarning):
    """A data problem that was repaired or skipped (and counted); the data is still usable."""
