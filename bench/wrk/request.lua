-- One fixed POST for every request, optionally paced to a fixed rate (bench/load.py runs it).
--
--   wrk ... -s bench/wrk/request.lua URL -- <body file> <rate/s, 0 = unpaced> ["name: value"]...
--
-- Pacing (rate > 0) is a tiny stand-in for wrk2: one schedule per wrk thread, one slot every
-- 1000/rate ms; wrk calls delay() before each request on every connection, and delay() hands
-- out the next slot. The rate holds while a connection is free when its slot comes, so run
-- it with a few more connections than rate x latency. Latency is measured from the actual
-- send, as wrk always does (no coordinated-omission correction: report the achieved rate).
--
-- done() prints one line "BENCH-JSON {...}" with exact percentiles (microseconds), which
-- bench/load.py prefers over wrk's rounded text report.

local ffi = require("ffi")

function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  file:close()
  wrk.headers["Content-Type"] = "application/json"
  for i = 3, #args do
    local name, value = args[i]:match("^([^:]+):%s*(.*)$")
    if name then
      wrk.headers[name] = value
    end
  end
  local rate = tonumber(args[2]) or 0
  if rate > 0 then
    local interval = 1000.0 / rate
    ffi.cdef([[
      typedef struct { long tv_sec; long tv_nsec; } bench_timespec_t;
      int clock_gettime(int clock_id, bench_timespec_t *tp);
    ]])
    local ts = ffi.new("bench_timespec_t")
    local function now_ms()
      ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
      return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
    end
    local next_at = nil
    function delay()
      local now = now_ms()
      next_at = (next_at or now) + interval
      local wait = next_at - now
      if wait <= 0 then
        return 0
      end
      return math.floor(wait + 0.5)
    end
  end
end

function done(summary, latency, requests)
  local errors = summary.errors
  local percentiles = {}
  for _, p in ipairs({ 50, 75, 90, 99, 99.9 }) do
    percentiles[#percentiles + 1] = string.format('"p%s":%d', p, latency:percentile(p))
  end
  io.write(string.format(
    'BENCH-JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"min":%d,"max":%d,"mean":%.1f,"stdev":%.1f,%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency.min, latency.max, latency.mean, latency.stdev, table.concat(percentiles, ",")
  ))
end
