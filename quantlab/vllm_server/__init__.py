"""vLLM as quantlab runs it: its OpenAI-compatible server in a venv of its own (.vllm/, `make vllm`), started on
127.0.0.1 on a free port, spoken to over HTTP, and stopped cleanly (server.py); the client (client.py); what vLLM
says of its own memory, from its log and its metrics (accounting.py); and a load generator that reports what
`vllm bench serve` reports (load.py). Nothing here imports vLLM: it lives in another venv with another torch and
another transformers.
"""
