"""Test and operations tools for walstore (not part of the installed package).

``tools.faults`` is the fault-injection / recording I/O backend; ``tools/writer.py`` is the
writer process the crash tests kill.
"""
