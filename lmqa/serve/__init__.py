"""`lmqa serve`: saved contexts behind an OpenAI-compatible HTTP API.

A question through `lmqa ask` pays the process start, the model load and
kernel compilation every time; a server pays them once, and the tools that
already speak the OpenAI API (clients, editor plugins, agents) can ask.

protocol.py: the request and response shapes; worker.py: the one thread that
answers; app.py: the FastAPI app over loaded sessions; command.py: the typer
command that loads them and runs uvicorn.
"""
