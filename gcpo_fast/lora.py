"""`python -m gcpo_fast.lora merge ADAPTER --out DIR`: a LoRA checkpoint merged into a plain model folder.

The command's code is gcpo_fast/models/lora.py (`main`); this file keeps its name as a command.
"""

from gcpo_fast.models.lora import main

if __name__ == "__main__":
    main()
