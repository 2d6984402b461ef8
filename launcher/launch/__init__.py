"""Launching: the `sft` commands, rank supervision, the job lifecycle, rank errors, preflight checks, the plan."""
