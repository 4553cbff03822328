"""Training-side code: the official losses of stages 1, 2 and 3-5 (`losses`), the shared trainer core (`loop`),
the data readers (`data`), the five stage trainers `run_stage1` ... `run_stage5` (`stages`) and the
`medsight train stageN` command (`cli.main`)."""
