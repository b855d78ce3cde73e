"""dlora_sim: a discrete-event simulator of multi-LoRA LLM serving clusters."""
