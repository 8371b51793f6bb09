"""Before a run: what it will need (memory from the model's config alone, time per step from a few measured steps)
and whether it fits the machine. `sftops plan` prints it; the train stage refuses a run that cannot fit."""
