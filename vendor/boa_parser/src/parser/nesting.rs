//! Caps how deep the parser nests (fazt patch, see vendor/PATCHES.md).
//!
//! Every production that recurses (assignment and unary expressions, `**`, `||`,
//! statements, binding patterns) holds a [`Nesting`] while it runs, and every loop that
//! builds a left-deep tree (`a+b+c…`, `a.b.c…`, `f()()…`) adds to a [`Chain`]. Both count
//! into one per-thread depth. Past [`MAX_NESTING`], or when the native stack runs low,
//! parsing fails with a syntax error. Capping the count, not only the stack, also caps
//! the depth of the tree the compiler, the scope analyser and `Drop` later recurse over.

use std::cell::Cell;

use boa_ast::{Position, Spanned};
use boa_interner::Interner;

use super::cursor::Cursor;
use crate::{Error, error::ParseResult, source::ReadChar};

/// Deepest nesting accepted. Real programs stay far below (a few dozen); each level costs
/// the compiler and scope analyser well under 8 KiB of native stack (measured: see
/// fazt's `deeply_nested_source_is_a_syntax_error` test), so a whole tree of this depth
/// needs at most 1,000 * 8 KiB = 8 MiB; the 16 MiB JS threads of fazt keep the rest.
/// `eval` and `new Function` check that much is free before they compile.
pub(super) const MAX_NESTING: u32 = 1_000;

std::thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

fn too_deep<R: ReadChar>(cursor: &mut Cursor<R>, interner: &mut Interner) -> Error {
    let position = cursor
        .peek(0, interner)
        .ok()
        .flatten()
        .map_or_else(|| Position::new(1, 1), |t| t.span().start());
    Error::general(
        "the code nests too deeply (more than 1,000 levels, or the native stack is low)",
        position,
    )
}

fn add<R: ReadChar>(cursor: &mut Cursor<R>, interner: &mut Interner) -> ParseResult<()> {
    let depth = DEPTH.with(|d| {
        let v = d.get().saturating_add(1);
        d.set(v);
        v
    });
    if depth > MAX_NESTING || crate::native_stack::low() {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        return Err(too_deep(cursor, interner));
    }
    Ok(())
}

/// One level of recursion, released when dropped.
pub(super) struct Nesting(());

impl Nesting {
    pub(super) fn enter<R: ReadChar>(
        cursor: &mut Cursor<R>,
        interner: &mut Interner,
    ) -> ParseResult<Self> {
        add(cursor, interner)?;
        Ok(Self(()))
    }
}

impl Drop for Nesting {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// The links of a left-deep chain built by a loop, released together when dropped.
#[derive(Default)]
pub(super) struct Chain(u32);

impl Chain {
    pub(super) fn add<R: ReadChar>(
        &mut self,
        cursor: &mut Cursor<R>,
        interner: &mut Interner,
    ) -> ParseResult<()> {
        add(cursor, interner)?;
        self.0 += 1;
        Ok(())
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        let n = self.0;
        DEPTH.with(|d| d.set(d.get().saturating_sub(n)));
    }
}
