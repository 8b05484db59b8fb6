// Start daemon
fazt.worker.spawn('workers/ticker.js', {
    daemon: true,
    timeout: null
});
