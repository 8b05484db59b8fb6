// workers/ticker.js
let count = job.getCheckpoint()?.count || 0;
while (!job.cancelled) {
    count++;
    fazt.realtime.broadcast('tick', { count });
    job.checkpoint({ count });
    job.sleep(1000);
}
