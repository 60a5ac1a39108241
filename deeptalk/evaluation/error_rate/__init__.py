"""The WER / CER `evaluate` metric shipped with deeptalk (load it with `evaluate.load` on this folder;
see `error_rate.py`). A package only so that it is installed with deeptalk."""
