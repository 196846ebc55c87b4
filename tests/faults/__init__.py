"""Fault injection: kills at each moment of a save, full disks, a run folder on another filesystem, hostile files
served over HTTP, resumes with changed settings, corrupt data and files. Each test names the fault; the README's
reliability section tables what the project does for each."""
