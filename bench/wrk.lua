-- Sends the agent's token (read from the file named by BENCH_TOKEN_FILE, so it never appears
-- in argv) and prints the run's summary as one JSON line for bench/run.py.
local path = os.getenv("BENCH_TOKEN_FILE")
if path ~= nil and path ~= "" then
  local f = assert(io.open(path, "r"))
  wrk.headers["Authorization"] = "Bearer " .. f:read("*l")
  f:close()
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50.0), latency:percentile(99.0),
    e.connect, e.read, e.write, e.status, e.timeout))
end
