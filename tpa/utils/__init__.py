"""Helpers shared by the commands and their implementations, below all of them: command-line
arguments (:mod:`tpa.utils.args`), atomic result files (:mod:`tpa.utils.files`), devices and dtypes
(:mod:`tpa.utils.devices`), run metadata (:mod:`tpa.utils.runinfo`) and result tables
(:mod:`tpa.utils.tables`). Nothing here imports torch at import time."""
