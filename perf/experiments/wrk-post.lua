-- wrk script: POST /api/events with the 5-property event flux-loadtest's `ingest` sends,
-- over 1,000 entities. A lean C client to compare the generator with:
--   wrk -t2 -c32 -d5s -s perf/experiments/wrk-post.lua http://127.0.0.1:<port>
-- CPU per request: utime+stime of /proc/<pid>/stat of wrk and of the server around the run.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local counter = 0
request = function()
  counter = counter + 1
  local body = '{"stream":"s","source":"wrk","timestamp":1700000000000,"payload":{"entity_id":"loadtest/dev-'
    .. (counter % 1000)
    .. '","properties":{"p0":1007,"p1":7.1,"p2":"v1007","p3":false,"p4":1007}}}'
  return wrk.format(nil, "/api/events", nil, body)
end
