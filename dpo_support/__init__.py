"""The machinery of online_dpo.py that a first reading skips, a module per concern. online_dpo.py holds the loop and
everything a step runs; it calls these through a few named calls and marks those lines `# TRY NOT TO MODIFY`.
Nothing here imports online_dpo (it runs as a script); what a check must run of the step is passed in.

- checks.py: the flags, files, data, models, reward functions and judge, checked before any model loads.
- checkpoint.py: checkpoints, resume, the final save, crash-safe writes, the output_dir lock, LoRA's files, the Hub.
- command_line.py: the flags' parser, and every way a run ends: one error line and an exit code.
- signals.py: SIGTERM, Ctrl-C and SIGHUP, deferred to the end of a step.
- http_judge.py: the judge over an OpenAI-compatible API.
- faults.py: the kinds of error, and one rank's error raised on all.
- ranks.py: rank 0 prints and writes; what every rank gathers.
"""
