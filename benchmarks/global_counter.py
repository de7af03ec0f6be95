"""The ceiling: the seed's counter as a per-process global (wrong, but free)."""

from flask import Flask

app = Flask(__name__)
hits = 0


@app.get("/")
def index() -> str:
    global hits
    hits += 1
    return f"{hits}\n"
