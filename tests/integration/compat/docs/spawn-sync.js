// Spawn a job
const job = fazt.worker.spawn('workers/sync.js', {
    data: { userId: 123 },
    memory: '64MB',
    timeout: '5m',      // or null for indefinite
    daemon: true,       // restart on crash
    uniqueKey: 'sync-123'
});
