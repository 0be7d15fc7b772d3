-- The steady workload for wrk, as an independent cross-check of the harness's load
-- generator: customers drawn uniformly from cust-00000..cust-(N-1), routes weighted
-- hello 2 : analytics 1 : search 1, requests formatted once in init() (four per customer)
-- and sent in that order, round and round.
--
--   CUSTOMERS=10000 wrk -t1 -c64 -d10s -s bench/wrk/steady.lua http://127.0.0.1:PORT
--
-- The target must serve the customers: `go run ./bench -serve` starts the sidecar, the
-- bare proxy, nginx and the upstream with them and prints their addresses. Against the
-- bare proxy, nginx or the upstream the headers are simply forwarded. There is no
-- response() callback: it would cost wrk a Lua call per answer; done() reports the
-- answers that were not 2xx or 3xx from wrk's own count.
local customers = tonumber(os.getenv("CUSTOMERS") or "10000")
local reqs = {}
local n = 0

function init(args)
  math.randomseed(7)
  -- Four requests per customer, so that nearly every customer (98%) is asked for, as in
  -- the harness, which draws from all of them: with fewer, the sidecar's data for the
  -- customers asked for fits the CPU's caches better, and the cross-check flatters it.
  for k = 1, math.max(8192, 4 * customers) do
    local i = math.random(0, customers - 1)
    local c = string.format("cust-%05d", i)
    local r = math.random(4)
    local path, headers = nil, {["X-Customer-Id"] = c, ["User-Agent"] = "gatehouse-bench-wrk"}
    if r <= 2 then
      path = "/v1/hello"
    elseif r == 3 then
      path = string.format("/v1/analytics/report/%d?range=7d", i % 7)
    else
      path = string.format("/v1/search/q%d", i % 100)
      headers["X-Search-Cost"] = tostring(1 + i % 3)
    end
    reqs[k] = wrk.format("GET", path, headers)
  end
end

function request()
  n = n % #reqs + 1
  return reqs[n]
end

function done(summary, latency, requests)
  io.write(string.format("non-2xx/3xx answers: %d, socket errors: %d\n", summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
