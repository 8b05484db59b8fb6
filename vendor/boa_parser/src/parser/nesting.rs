//! Caps how deep the parser nests (fazt patch, see vendor/PATCHES.md).
//!
//! Every production that recurses (assignment expressions, the operands of unary
//! operators, `await`, `new` and `**`, `||`, statements, binding patterns) holds a
//! [`Nesting`] while it runs, and every loop that builds a left-deep tree (`a+b+c…`,
//! `a.b.c…`, `f()()…`) adds to a [`Chain`]. So one level of brackets, parentheses,
//! operators or calls costs one unit, and a block two (statement and list item). Both count
//! into one per-thread depth. Past [`MAX_NESTING`], or when the native stack runs low,
//! parsing fails with a syntax error. Capping the count, not only the stack, also caps
//! the depth of the tree the compiler, the scope analyser and `Drop` later recurse over.

use std::cell::Cell;

use boa_ast::{Position, Spanned};
use boa_interner::Interner;

use super::cursor::Cursor;
use crate::{Error, error::ParseResult, source::ReadChar};

/// Most nesting units accepted. The native stack binds first for most forms: the
/// parser takes about 115 KiB of stack per level of brackets and 15 KiB per unary
/// operator (boa 0.22, measured), so a 16 MiB thread parses about 130 levels of `[` and
/// 990 of `!`. Loops that build left-deep trees (`1+1+…`, `a.b.…`, `f()()…`) use no
/// parser stack; this cap bounds the depth of those trees, which the compiler, the scope
/// analyser and `Drop` recurse over (a 1,000-deep chain compiles within 1 MiB).
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
        "the code nests too deeply (over 1,000 levels, or the native stack is low)",
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

/// Runs `f` (a production that recurses without passing a guarded one, such as the
/// operand of `!`, `await`, `new` or `**`) one level deeper.
pub(super) fn nested<R: ReadChar, T>(
    cursor: &mut Cursor<R>,
    interner: &mut Interner,
    f: impl FnOnce(&mut Cursor<R>, &mut Interner) -> ParseResult<T>,
) -> ParseResult<T> {
    let _nesting = Nesting::enter(cursor, interner)?;
    f(cursor, interner)
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
