// Upstream fazt's simulator endpoints, written as upstream apps are: top-level code
// with `request` in scope, a top-level `return`, and `respond` for statuses.
//
//   POST /api/simulate/start   the running simulator (started if needed)
//   GET  /api/simulate/status  its job, progress through the mall's day, and viewers
//   POST /api/simulate/stop    cancels it
//
// Starting reuses api/start.js (a CommonJS handler) through `require`, so both routes
// share one simulator and one set of spawn options.
const action = request.path.split("/")[3] || "status";
const viewers = fazt.realtime.count("mall");

function current() {
  for (const status of ["running", "queued"]) {
    const job = fazt.worker.list({ status }).find((j) => j.path === "workers/simulator.js");
    if (job) return job;
  }
  return null;
}

if (action === "start") {
  if (request.method !== "POST") return respond(405, { error: "use POST /api/simulate/start" });
  const job = require("./start.js")();
  return { running: true, job, progress: job.progress, viewers };
}

if (action === "status") {
  if (request.method !== "GET") return respond(405, { error: "use GET /api/simulate/status" });
  const job = current();
  return { running: job !== null, job, progress: job ? job.progress : 0, viewers };
}

if (action === "stop") {
  if (request.method !== "POST") return respond(405, { error: "use POST /api/simulate/stop" });
  const job = current();
  if (job === null) return { running: false, stopped: null, viewers };
  return { running: false, stopped: fazt.worker.cancel(job.id), viewers };
}

return respond(404, { error: "no such action: use start, status or stop" });
