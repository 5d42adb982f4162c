"""The one exception type for problems a user's data can cause."""


class DataError(Exception):
  """A scan or dataset that cannot be used, with a message naming the file or config key.

  Raised instead of library tracebacks (nibabel, pydicom, numpy) so the CLI can print one clear line
  and sources can skip bad scans by config.
  """
