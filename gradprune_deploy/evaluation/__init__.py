"""`gradprune eval`: evaluate.py wires; hf.py and vllm.py are the backends; metrics.py is pure."""
