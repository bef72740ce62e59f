"""The one exception type that means "the user's input is wrong"."""


class InputError(Exception):
    """Bad input: the CLI prints the message as one line on stderr and exits with status 2.

    The message names the problem and what to do about it, e.g.
    ``"no CRS in hsi.tif: pass --crs EPSG:32611"``.
    """

    def __init__(self, message: str = "", *args) -> None:
        # torch's DataLoader re-raises a worker's exception as ``type(message + traceback)``:
        # keep the original one line, which is the traceback's last line
        text = str(message)
        if "\nOriginal Traceback" in text:
            last = text.rstrip().splitlines()[-1]
            text = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(text, *args)
