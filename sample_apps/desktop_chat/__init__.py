"""A Qt (PySide6) desktop chat window over a smolexport export: `python -m sample_apps.desktop_chat [DIR]`."""
