"""Training-side code: the official losses of stages 1, 2 and 3-5 (`losses`), the shared trainer core (`loop`),
sharded training with FSDP2 (`fsdp`), safe trainer state (`state`), the data readers (`data`), the five stage trainers
`run_stage1` ... `run_stage5` with LoRA for stage 5 (`stages`), exports to the release layout (`export`), the memory
plan (`plan`) and the `medsight train stageN|lora|plan|merge` command (`cli.main`)."""
