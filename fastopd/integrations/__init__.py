"""Drop-ins for other trainers: TRL (`fastopd.integrations.trl`), Hugging Face (`fastopd.integrations.hf`) and
Liger-Kernel users (`fastopd.integrations.liger`). Each submodule imports its framework only when imported."""
