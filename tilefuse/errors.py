"""The one exception type that means "the user's input is wrong"."""


class InputError(Exception):
    """Bad input: the CLI prints the message as one line on stderr and exits with status 2.

    The message names the problem and what to do about it, e.g.
    ``"no CRS in hsi.tif: pass --crs EPSG:32611"``.
    """
