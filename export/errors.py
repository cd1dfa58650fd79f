"""Export failures carry a message that says what was wrong and what to do."""


class ExportError(Exception):
    """An export that cannot proceed; nothing was written to the repository."""


class VerificationError(ExportError):
    """An exported artifact disagrees with PyTorch beyond tolerance; the message carries the numbers."""
