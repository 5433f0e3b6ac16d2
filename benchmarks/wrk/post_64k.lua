-- wrk request script: POST a 64 KiB body to /post (the URL path comes from wrk's URL).
-- Usable alone: wrk -t1 -c32 -d5s -s benchmarks/wrk/post_64k.lua http://127.0.0.1:10000/post
wrk.method = "POST"
wrk.body = string.rep("a", 65536)
wrk.headers["Content-Type"] = "application/octet-stream"
