"""What the tests share, one module per kind of thing:

- `servers`: the recording upstream and the real proxy on loopback (`running_proxy`), and
  `reset`, a server's connection closed with a reset.
- `cli`: the installed `keyproxy` command as a subprocess (`keyproxy`, `bash`), and long-lived
  ones (`started` and `ready`, for `serve` and `dev`).
- `issuer`: a workload-identity issuer whose signing key the tests hold.
- `polling`: `eventually`, the one bounded wait for state to change; `finishes`, a bounded
  wait for something that must end.
- `processes`: commands that leave a helper process holding their stdout (`Helpers`, the
  `helpers` fixture, which kills each one still running after the test), and `running`.
- `events`: `read_events`, the JSON events of a log file.
- `logscan`: every key and token the tests made (`CANARIES`), and the whole-session log scan.
- `configs`: configuration texts and sections for parsing tests, and the base document the
  tests of keyproxy.config change (`with_setting`) and parse (`parse_doc`).
- `legacy_api`: a fake legacy API with keys to rotate, run as its own process.
- `certs`: a throw-away CA with server and client certificates as PEM files (`pem_files`).
- `vault`, `identity`, `tokens`, `rotation`: what several test files of that package share
  (its fixtures are in tests/<package>/conftest.py).
"""
