// From serverless handler
fazt.worker.spawn('workers/sync.js', {
    daemon: true,
    memory: '64MB',
    timeout: null
});
