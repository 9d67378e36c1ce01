"""`medusa-engine serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

* `app.py`: the FastAPI app (`create_app(scheduler, tokenizer, options)`): routes, auth, limits;
* `protocol.py`: request bodies, response and error objects of the OpenAI API;
* `streaming.py`: token ids -> text deltas (incomplete UTF-8 and partial stop strings held back);
* `metrics.py`: `/metrics` in Prometheus text format;
* `cli.py`: the `serve` subcommand (uvicorn; graceful SIGINT / SIGTERM).

FastAPI is imported by `app.py` only, and `app.py` only when a server is made: nothing else in the
project needs the `serve` extra.
"""
