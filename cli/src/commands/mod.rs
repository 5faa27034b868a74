pub(crate) mod block;
pub(crate) mod browse;
pub(crate) mod check;
pub(crate) mod ebs;
pub(crate) mod ec2;
pub(crate) mod file;
pub(crate) mod iam;
pub(crate) mod iscan;
pub(crate) mod kafka;
pub(crate) mod mount;
pub(crate) mod nbd;
pub(crate) mod nbd_source;
pub(crate) mod prune;
pub(crate) mod rp;
pub(crate) mod stream;
pub(crate) mod vault;

use anyhow::Result;

use crate::cli::{Cli, Command};
use crate::context::Ctx;

pub fn run(args: Cli) -> Result<()> {
    let ctx = Ctx {
        global: args.global,
    };
    match args.command {
        Command::Vault(c) => vault::run(&ctx, c),
        Command::Block(c) => block::run(&ctx, c),
        Command::File(c) => file::run(&ctx, c),
        Command::Stream(c) => stream::run(&ctx, c),
        Command::Kafka(c) => kafka::run(&ctx, c),
        Command::Ebs(c) => ebs::run(&ctx, c),
        Command::Ec2(c) => ec2::run(&ctx, c),
        Command::Rp(c) => rp::run(&ctx, c),
        Command::Nbd(c) => nbd::run(&ctx, c),
        Command::Mount(a) => mount::mount(&ctx, a),
        Command::Check(a) => check::run(&ctx, a),
        Command::Iscan(a) => iscan::run(&ctx, a),
        Command::Prune(a) => prune::run(&ctx, a),
        Command::Umount { mountpoint } => mount::umount(&ctx, &mountpoint),
    }
}
