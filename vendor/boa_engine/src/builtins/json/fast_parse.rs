//! `JSON.parse` without a reviver, straight from the text (fazt patch, see
//! vendor/PATCHES.md).
//!
//! The stock implementation validates the text with serde_json, then parses it again as
//! a JavaScript expression, compiles and runs it. The JS parser needs about 100 KiB of
//! native stack per nesting level, so 60 levels of objects overflowed a 16 MiB thread.
//! Here serde_json's streaming deserializer builds the values directly: a few hundred
//! bytes of stack per level, at most 127 levels (serde_json's recursion limit), and no
//! compilation. Keys keep their document order, and a repeated key keeps its first
//! position with its last value, as `CreateDataProperty` does.

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

use crate::{
    Context, JsResult, JsString, JsValue, builtins::Array, error::JsNativeError,
    object::JsObject,
};

/// Parses `text` as JSON into a JS value, or a SyntaxError.
pub(crate) fn parse(text: &str, context: &mut Context) -> JsResult<JsValue> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Seed { context }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| JsNativeError::syntax().with_message(e.to_string()))?;
    Ok(value)
}

struct Seed<'c> {
    context: &'c mut Context,
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = JsValue;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<JsValue, D::Error> {
        d.deserialize_any(self)
    }
}

fn number(n: f64) -> JsValue {
    // Small integers as i32, like `JsValue::from_json`, so they compare and print alike.
    if n.fract() == 0.0 && n >= f64::from(i32::MIN) && n <= f64::from(i32::MAX) && !(n == 0.0 && n.is_sign_negative()) {
        #[allow(clippy::cast_possible_truncation)]
        return JsValue::new(n as i32);
    }
    JsValue::new(n)
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = JsValue;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<JsValue, E> {
        Ok(JsValue::null())
    }

    fn visit_bool<E>(self, b: bool) -> Result<JsValue, E> {
        Ok(JsValue::new(b))
    }

    #[allow(clippy::cast_precision_loss)]
    fn visit_i64<E>(self, n: i64) -> Result<JsValue, E> {
        Ok(number(n as f64))
    }

    #[allow(clippy::cast_precision_loss)]
    fn visit_u64<E>(self, n: u64) -> Result<JsValue, E> {
        Ok(number(n as f64))
    }

    fn visit_f64<E>(self, n: f64) -> Result<JsValue, E> {
        Ok(number(n))
    }

    fn visit_str<E>(self, s: &str) -> Result<JsValue, E> {
        Ok(JsString::from(s).into())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<JsValue, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element_seed(Seed {
            context: self.context,
        })? {
            items.push(v);
        }
        Ok(Array::create_array_from_list(items, self.context).into())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsValue, A::Error> {
        let obj = JsObject::with_object_proto(self.context.intrinsics());
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let value = map.next_value_seed(Seed {
                context: self.context,
            })?;
            obj.create_data_property_or_throw(JsString::from(&*key), value, self.context)
                .map_err(|e| A::Error::custom(e.to_string()))?;
        }
        Ok(obj.into())
    }
}
