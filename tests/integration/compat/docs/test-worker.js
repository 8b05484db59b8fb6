// api/test-worker.js
const jobId = fazt.worker.spawn('workers/hello.js', {});
return { jobId };
