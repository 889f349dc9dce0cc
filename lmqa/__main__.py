from lmqa.cli import app
app(prog_name="lmqa")
