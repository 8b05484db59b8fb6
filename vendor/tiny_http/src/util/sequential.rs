use std::io::Result as IoResult;
use std::io::{Read, Write};

// fazt patch: bounded channels of one slot. Each link of a chain carries one value
// once; an unbounded (list) channel allocated a block of 31 slots per request (about
// 2 KB for a buffered reader), a large-bin malloc that consolidated the fast bins.
use std::sync::mpsc::sync_channel;
use std::sync::mpsc::{Receiver, SyncSender as Sender};
use std::sync::{Arc, Mutex};

use std::mem;

pub struct SequentialReaderBuilder<R>
where
    R: Read + Send,
{
    inner: SequentialReaderBuilderInner<R>,
}

enum SequentialReaderBuilderInner<R>
where
    R: Read + Send,
{
    First(R),
    NotFirst(Receiver<R>),
}

pub struct SequentialReader<R>
where
    R: Read + Send,
{
    inner: SequentialReaderInner<R>,
    next: Sender<R>,
}

enum SequentialReaderInner<R>
where
    R: Read + Send,
{
    MyTurn(R),
    Waiting(Receiver<R>),
    Empty,
}

pub struct SequentialWriterBuilder<W>
where
    W: Write + Send,
{
    writer: Arc<Mutex<W>>,
    next_trigger: Option<Receiver<()>>,
}

pub struct SequentialWriter<W>
where
    W: Write + Send,
{
    trigger: Option<Receiver<()>>,
    writer: Arc<Mutex<W>>,
    on_finish: Sender<()>,
}

impl<R: Read + Send> SequentialReaderBuilder<R> {
    pub fn new(reader: R) -> SequentialReaderBuilder<R> {
        SequentialReaderBuilder {
            inner: SequentialReaderBuilderInner::First(reader),
        }
    }
}

impl<W: Write + Send> SequentialWriterBuilder<W> {
    pub fn new(writer: W) -> SequentialWriterBuilder<W> {
        SequentialWriterBuilder {
            writer: Arc::new(Mutex::new(writer)),
            next_trigger: None,
        }
    }
}

impl<R: Read + Send> Iterator for SequentialReaderBuilder<R> {
    type Item = SequentialReader<R>;

    fn next(&mut self) -> Option<SequentialReader<R>> {
        Some(self.next_reader())
    }
}

impl<R: Read + Send> SequentialReaderBuilder<R> {
    /// The next reader in the chain (never ends; fazt patch: no `unwrap` at call sites).
    pub fn next_reader(&mut self) -> SequentialReader<R> {
        let (tx, rx) = sync_channel(1);

        let inner = mem::replace(&mut self.inner, SequentialReaderBuilderInner::NotFirst(rx));

        match inner {
            SequentialReaderBuilderInner::First(reader) => SequentialReader {
                inner: SequentialReaderInner::MyTurn(reader),
                next: tx,
            },

            SequentialReaderBuilderInner::NotFirst(previous) => SequentialReader {
                inner: SequentialReaderInner::Waiting(previous),
                next: tx,
            },
        }
    }
}

impl<W: Write + Send> Iterator for SequentialWriterBuilder<W> {
    type Item = SequentialWriter<W>;
    fn next(&mut self) -> Option<SequentialWriter<W>> {
        Some(self.next_writer())
    }
}

impl<W: Write + Send> SequentialWriterBuilder<W> {
    /// The next writer in the chain (never ends).
    pub fn next_writer(&mut self) -> SequentialWriter<W> {
        let (tx, rx) = sync_channel(1);
        let mut next_next_trigger = Some(rx);
        ::std::mem::swap(&mut next_next_trigger, &mut self.next_trigger);

        SequentialWriter {
            trigger: next_next_trigger,
            writer: self.writer.clone(),
            on_finish: tx,
        }
    }
}

impl<R: Read + Send> SequentialReader<R> {
    /// fazt patch: blocks until the readers before this one are gone (the previous
    /// request's body was dropped), so the caller can set the socket's timeouts for
    /// its own phase before reading. False if the chain broke.
    pub fn wait_turn(&mut self) -> bool {
        let inner = mem::replace(&mut self.inner, SequentialReaderInner::Empty);
        match inner {
            SequentialReaderInner::Waiting(recv) => match recv.recv() {
                Ok(reader) => {
                    self.inner = SequentialReaderInner::MyTurn(reader);
                    true
                }
                Err(_) => false,
            },
            SequentialReaderInner::MyTurn(r) => {
                self.inner = SequentialReaderInner::MyTurn(r);
                true
            }
            SequentialReaderInner::Empty => false,
        }
    }
}

/// fazt patch: the buffered reader underneath, once it is this reader's turn, so a
/// request head is scanned in the buffer a line at a time instead of a byte per call.
impl<R: std::io::BufRead + Send> SequentialReader<R> {
    /// Like `BufRead::fill_buf`, waiting for the turn first.
    pub fn fill_buf(&mut self) -> IoResult<&[u8]> {
        if !self.wait_turn() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "connection closed",
            ));
        }
        match self.inner {
            SequentialReaderInner::MyTurn(ref mut reader) => reader.fill_buf(),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "connection closed",
            )),
        }
    }

    /// Like `BufRead::consume`; only after `fill_buf`.
    pub fn consume(&mut self, n: usize) {
        if let SequentialReaderInner::MyTurn(ref mut reader) = self.inner {
            reader.consume(n);
        }
    }
}

impl<R: Read + Send> Read for SequentialReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        // fazt patch: a broken chain is an error, not a panic.
        let broken = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "connection closed");
        let mut reader = match self.inner {
            SequentialReaderInner::MyTurn(ref mut reader) => return reader.read(buf),
            SequentialReaderInner::Waiting(ref mut recv) => recv.recv().map_err(|_| broken())?,
            SequentialReaderInner::Empty => return Err(broken()),
        };

        let result = reader.read(buf);
        self.inner = SequentialReaderInner::MyTurn(reader);
        result
    }
}

impl<W: Write + Send> Write for SequentialWriter<W> {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        if let Some(v) = self.trigger.as_mut() {
            let _ = v.recv();
        }
        self.trigger = None;

        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(buf)
    }

    fn flush(&mut self) -> IoResult<()> {
        if let Some(v) = self.trigger.as_mut() {
            let _ = v.recv();
        }
        self.trigger = None;

        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush()
    }
}

impl<R> Drop for SequentialReader<R>
where
    R: Read + Send,
{
    fn drop(&mut self) {
        let inner = mem::replace(&mut self.inner, SequentialReaderInner::Empty);

        match inner {
            SequentialReaderInner::MyTurn(reader) => {
                self.next.send(reader).ok();
            }
            SequentialReaderInner::Waiting(recv) => {
                if let Ok(reader) = recv.recv() {
                    self.next.send(reader).ok();
                }
            }
            SequentialReaderInner::Empty => (),
        }
    }
}

impl<W> Drop for SequentialWriter<W>
where
    W: Write + Send,
{
    fn drop(&mut self) {
        self.on_finish.send(()).ok();
    }
}
