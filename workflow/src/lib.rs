//! The workflow language: definitions in YAML or JSON ([`def`]), CEL expressions and
//! `${{ … }}` templates ([`expr`]), and validation that compiles every expression once and
//! names the path of each problem ([`validate`]). The coordinator runs what comes out,
//! a [`Workflow`]; the CLI uses the same code to check a file before sending it.

pub mod def;
pub mod expr;
pub mod fuzz;
pub mod validate;

pub use def::{
    Budget, MemoryDef, MemoryScope, OnExceed, OnFailure, RetryDef, StepDef, WorkflowDef,
};
pub use expr::{Bindings, Expr, RunBindings, Template};
pub use validate::{
    Action, Invalid, JsonSchema, Limits, MAX_MEMORY_LAST, Memory, Problem, Step, Target, Workflow,
    check_sub_workflows, load, parse, validate,
};
